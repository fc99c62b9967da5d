"""What the effnet-timm commands do, as library functions: predict, validate, info, run."""
