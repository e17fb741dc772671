"""glora-math inside real federated fine-tuning: peft I/O, runners, Flower glue."""
