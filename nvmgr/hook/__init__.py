"""The libvirt qemu hook.

:mod:`nvmgr.hook.entry` reads the call (argv, the domain XML on stdin) and
answers with an exit code; :mod:`nvmgr.hook.lifecycle` does the work of each
step of a domain's life.  Nothing here imports libvirt: a hook that called
back into libvirtd would deadlock it (``tests/test_architecture.py`` holds
the import closure to that).
"""
