"""RLHF: PPO maths (pure functions), rollouts, the PPO loop, and the evaluation of a policy against SFT."""
