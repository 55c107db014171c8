"""nvmgr.format."""
