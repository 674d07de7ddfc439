"""RL maths, framework-free: RLOO advantages, dynamic sampling of contexts, and the CFG flow-matching loss."""
