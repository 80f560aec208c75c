"""hyperjob: LoRA fine-tuning of Llama-class models on Slurm (Trainium and NVIDIA GPUs)."""

__version__ = "0.1.0"
