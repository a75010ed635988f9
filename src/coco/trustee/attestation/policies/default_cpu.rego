# coco's default attestation policy for CPU-class evidence (policy id "default_cpu").
#
# It grades the verifier's claims into an AR4SI trust vector. A claim becomes "approved" only when
# the evidence matches reference values registered in the RVPS; with none registered the token
# comes out "contraindicated" (executables 33, hardware 97, configuration 36). Values used below:
#   2 / 3  recognized and approved            33  unrecognized executables
#   36     configuration not available         97  unrecognized hardware
package policy

import rego.v1

default executables := 33

default hardware := 97

default configuration := 36

trust_claims := {
	"instance-identity": 0,
	"configuration": configuration,
	"executables": executables,
	"file-system": 0,
	"hardware": hardware,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}

rv(name) := query_reference_value(name)

# --- sample: the no-hardware TEE (INSECURE; tests only) ---------------------------------------

executables := 3 if input.sample.launch_digest in rv("launch_digest")

hardware := 2 if {
	pv := input.sample.platform_version
	input.sample.svn in rv("svn")
	pv.major == rv("major_version")
	pv.minor >= rv("minimum_minor_version")
}

configuration := 2 if input.sample.debug == false

# --- AMD SEV-SNP ------------------------------------------------------------------------------

executables := 3 if input.snp.measurement in rv("snp_launch_measurement")

hardware := 2 if {
	s := input.snp
	s.reported_tcb_bootloader in rv("snp_bootloader")
	s.reported_tcb_tee in rv("snp_tee_svn")
	s.reported_tcb_snp in rv("snp_snp_svn")
	s.reported_tcb_microcode in rv("snp_microcode")
}

snp_locked_down if {
	input.snp.policy_debug_allowed == false
	input.snp.policy_migrate_ma == false
}

snp_platform_as_expected if {
	s := input.snp
	s.platform_smt_enabled == rv("snp_smt_enabled")
	s.platform_tsme_enabled == rv("snp_tsme_enabled")
	s.policy_abi_major == rv("snp_guest_abi_major")
	s.policy_abi_minor == rv("snp_guest_abi_minor")
	s.policy_single_socket == rv("snp_single_socket")
	s.policy_smt_allowed == rv("snp_smt_allowed")
}

configuration := 2 if {
	snp_locked_down
	snp_platform_as_expected
} else := 3 if snp_locked_down

# --- Intel TDX --------------------------------------------------------------------------------

tdx_rtmrs_known if {
	b := input.tdx.quote.body
	b.rtmr_1 in rv("rtmr_1")
	b.rtmr_2 in rv("rtmr_2")
}

tdx_kernel_known if {
	some ev in input.tdx.uefi_event_logs
	ev.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"
	"File(kernel)" in ev.details.device_paths
	some d in ev.digests
	d.digest == rv("tdvfkernel")
}

tdx_cmdline_known if {
	some ev in input.tdx.uefi_event_logs
	ev.type_name == "EV_EVENT_TAG"
	ev.details.string == "LOADED_IMAGE::LoadOptions"
	some d in ev.digests
	d.digest == rv("tdvfkernelparams")
}

executables := 3 if {
	tdx_rtmrs_known
	tdx_kernel_known
	tdx_cmdline_known
} else := 4 if tdx_rtmrs_known

tdx_genuine(t) if {
	t.quote.header.tee_type == "81000000"
	t.quote.header.vendor_id == "939a7233f79c4ca9940a0db3957f0607"
	t.quote.body.mr_td in rv("mr_td")
	t.tcb_status == "UpToDate"
}

hardware := 2 if {
	tdx_genuine(input.tdx)
	input.tdx.collateral_expiration_status == "0"
}

configuration := 2 if {
	input.tdx.td_attributes.debug == false
	input.tdx.quote.body.xfam in rv("xfam")
}

# --- Azure SEV-SNP CVM with vTPM --------------------------------------------------------------

azsnp := input["az-snp-vtpm"]

executables := 3 if {
	azsnp.measurement in rv("measurement")
	azsnp.tpm.pcr11 in rv("snp_pcr11")
}

hardware := 2 if {
	azsnp.reported_tcb_bootloader in rv("tcb_bootloader")
	azsnp.reported_tcb_tee in rv("tcb_tee")
	azsnp.reported_tcb_snp in rv("tcb_snp")
	azsnp.reported_tcb_microcode in rv("tcb_microcode")
}

configuration := 2 if {
	azsnp.platform_smt_enabled in rv("smt_enabled")
	azsnp.platform_tsme_enabled in rv("tsme_enabled")
	azsnp.policy_abi_major in rv("abi_major")
	azsnp.policy_abi_minor in rv("abi_minor")
	azsnp.policy_single_socket in rv("single_socket")
	azsnp.policy_smt_allowed in rv("smt_allowed")
}

# --- Azure TDX CVM with vTPM ------------------------------------------------------------------

aztdx := input["az-tdx-vtpm"]

executables := 3 if aztdx.tpm.pcr11 in rv("tdx_pcr11")

hardware := 2 if tdx_genuine(aztdx)

configuration := 2 if aztdx.quote.body.xfam in rv("xfam")

# --- generic TPM ------------------------------------------------------------------------------

hardware := 2 if input.tpm

executables := 3 if {
	input.tpm.pcr11 in rv("tpm_pcr11")
	input.tpm.ak_public in rv("trusted_aks")
}

configuration := 0 if input.tpm

# --- IBM Secure Execution: the verifier checked everything that matters -----------------------

executables := 3 if input.se

hardware := 2 if input.se

configuration := 2 if input.se

# --- workload identifiers from the init-data agent policy -------------------------------------

default policy_containers := []

policy_containers := input.init_data_claims.agent_policy_claims.containers

image_names := [name |
	some c in policy_containers
	name := c.OCI.Annotations["io.kubernetes.cri.image-name"]
]

user_ids := [uid |
	some c in policy_containers
	uid := c.OCI.Process.User.UID
]

identifiers["container_images"] := image_names if count(image_names) > 0

identifiers["container_uids"] := user_ids if count(user_ids) > 0

extensions := [{"name": "ear.trustee.identifiers", "key": -18, "value": {"validated": object.union(identifiers, {})}}]
