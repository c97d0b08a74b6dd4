"""fga_search.train: private modules (the public names are re-exported by fga_search)."""
