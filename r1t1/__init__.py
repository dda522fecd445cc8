"""R1-T1 translation reasoning: CoT templates, prompts, data, the trainer config and trainer, evaluation."""
