"""fga_search.data: private modules (the public names are re-exported by fga_search)."""
