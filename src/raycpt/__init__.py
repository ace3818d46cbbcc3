"""raycpt: continued pretraining of Hugging Face causal LMs on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
