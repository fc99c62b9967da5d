"""Images in: the TF-exact official eval preprocessing and the ImageNet validation layouts."""
