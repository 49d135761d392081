"""Pure loss and step functions: flow matching (LoRA training), DMD and DCM distillation."""
