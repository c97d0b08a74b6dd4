"""fga_search.deploy: private modules (the public names are re-exported by fga_search)."""
