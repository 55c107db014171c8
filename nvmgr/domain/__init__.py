"""nvmgr.domain."""
