"""RLHF outside the step: rollouts, scoring, KL penalties and advantages are pure functions;
the policy update is the one train step with the PPO / GRPO objective (jaxllm/objectives)."""
