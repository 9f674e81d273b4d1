"""Post-training: knowledge distillation (teacher and loss) and Minitron-style pruning."""
