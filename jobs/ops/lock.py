"""The bank's write lock, one for every command that writes a bank: storage/lock.py (below the
stages and training, which take it too, in the import layers of pyproject.toml), re-exported
here for the commands and tests that import it from jobs.ops."""

from storage.lock import LOCK, BankLock, LockError, write_lock, writes_bank

__all__ = ["LOCK", "BankLock", "LockError", "write_lock", "writes_bank"]
