"""Azure confidential VMs on SEV-SNP with a paravisor vTPM (``az-snp-vtpm``)."""
