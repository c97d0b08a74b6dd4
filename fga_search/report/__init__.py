"""fga_search.report: private modules (the public names are re-exported by fga_search)."""
