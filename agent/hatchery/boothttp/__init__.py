"""Boot over HTTP: per-MAC iPXE scripts from pxe/ profiles, and the artefacts they load."""
