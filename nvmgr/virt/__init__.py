"""nvmgr.virt."""
