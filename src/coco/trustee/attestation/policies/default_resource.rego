# coco's default KBS resource policy.
#
# input: the verified attestation token claims (EAR: input.submods.cpu0 ...)
# data:  {"plugin": ..., "resource-path": [...], "query": {...}}
#
# Releases resources of the "resource" plugin to any attested hardware TEE, and never to the
# INSECURE sample TEE: tests that use the sample attester must upload a policy of their own.
package policy

default allow := false

hardware_tee if {
	evidence := input.submods.cpu0["ear.veraison.annotated-evidence"]
	not evidence.sample
}

allow if {
	data.plugin == "resource"
	hardware_tee
}
