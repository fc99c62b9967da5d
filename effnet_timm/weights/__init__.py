"""Where weights come from: the official tag table, the first-use cache, downloads and integrity records."""
