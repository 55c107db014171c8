"""nvmgr.crypto."""
