"""nvmgr.storage."""
