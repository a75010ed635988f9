# coco's default attestation policy for GPU-class evidence (policy id "default_gpu").
# Same grading as default_cpu: approved only against RVPS reference values.
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

# sampledevice: the no-hardware device (INSECURE; tests only)
hardware := 2 if input.sampledevice.svn in query_reference_value("device_svn")

nv := input.nvidia

nv_checks_pass(prefix) if {
	nv[concat("", [prefix, "-cert-chain"])]["x-nvidia-cert-status"] == "valid"
	nv[concat("", [prefix, "-cert-chain"])]["x-nvidia-cert-ocsp-status"] == "good"
}

hardware := 2 if {
	nv_checks_pass("x-nvidia-gpu-attestation-report")
	nv["x-nvidia-gpu-attestation-report-parsed"]
	nv["x-nvidia-gpu-attestation-report-signature-verified"]
	nv["x-nvidia-gpu-attestation-report-cert-chain-fwid-match"]
	nv["x-nvidia-gpu-arch-check"]
}

nv_locked if {
	nv.secboot
	nv.dbgstat == "disabled"
}

configuration := 2 if {
	nv_locked
	nv["x-nvidia-gpu-vbios-version"] in query_reference_value("allowed_vbios_versions")
	nv["x-nvidia-gpu-driver-version"] in query_reference_value("allowed_driver_versions")
} else := 3 if nv_locked

executables := 3 if {
	nv_checks_pass("x-nvidia-gpu-vbios-rim")
	every part in ["driver", "vbios"] {
		every check in ["fetched", "measurements-available", "schema-validated", "signature-verified", "version-match"] {
			nv[concat("-", ["x-nvidia-gpu", part, "rim", check])]
		}
	}
	nv.measres == "success"
}
