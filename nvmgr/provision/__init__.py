"""nvmgr.provision."""
