"""Azure confidential VMs on TDX with a paravisor vTPM (``az-tdx-vtpm``)."""
