"""Training samples built from rollouts (framework-free): chunks with advantages, padding for rank lockstep."""
