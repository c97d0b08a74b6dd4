"""fga_search.runs: private modules (the public names are re-exported by fga_search)."""
