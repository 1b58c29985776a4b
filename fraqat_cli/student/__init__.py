"""The stored student: its checkpoint files, building it from a teacher and rebuilding it from a file, LoRA."""
