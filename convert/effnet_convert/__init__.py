"""Official TensorFlow EfficientNet checkpoints -> effnet_timm safetensors, without TensorFlow."""
