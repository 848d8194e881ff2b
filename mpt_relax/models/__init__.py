"""Model families compiled by mpt_relax (one subpackage per family)."""
