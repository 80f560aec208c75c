raise ImportError("hyperjob --print-args must not import torch")
