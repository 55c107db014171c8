"""nvmgr.domain: from a libvirt domain's XML to the plan of its image and QEMU's arguments.

One job per module, in the order the data flows::

    namespaces  the XML namespaces nvmgr reads and writes (NVMGR_NS, QEMU_NS); no lxml
    xmlparse    the hardened parse: size, depth, encoding, no DTD or entities;
                the only place text reaches lxml's parser
    xmlbind     descriptors mapping XML to typed attributes (XMLProperty, Child, ...)
    metadata    nvmgr's metadata as frozen dataclasses; read once (RelaxNG, then
                the rules a schema cannot say) and written back as an element
    elements    Domain, OS, Loader, Nvram, TPM: the parsed domain and its edits;
                parse_domain is the way in, Domain.to_xml the way out
    profiles    what each device kind needs, as tables; firmware autoselection
    plan        the sections a domain needs, placed (plain data)
    qemuargs    the QEMU arguments a plan needs, the domain rewrite that carries
                them, and the one reader of those arguments
"""
