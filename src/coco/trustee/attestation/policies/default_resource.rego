# coco's default KBS resource policy.
#
# input: the verified attestation token claims (EAR: input.submods.cpu0 ...)
# data:  {"plugin": ..., "resource-path": [...], "query": {...}}
#
# Releases resources of the "resource" plugin to the holder of any verified attestation token,
# except one that attested with the INSECURE sample TEE: tests that use the sample attester must
# upload a policy of their own.
package policy

default allow := false

sample_evidence if input.submods.cpu0["ear.veraison.annotated-evidence"].sample

allow if {
	data.plugin == "resource"
	not sample_evidence
}
