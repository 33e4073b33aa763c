"""The warmup and continual training stages: the DeepSpeed loop on Ray Train (trainer), its
held-out evidence, its log and the codec its real-time memories pass through."""
