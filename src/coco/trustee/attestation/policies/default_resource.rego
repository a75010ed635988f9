# coco's default KBS resource policy.
#
# input: the verified attestation token claims (EAR: input.submods.cpu0 ...)
# data:  {"plugin": ..., "resource-path": [...], "query": {...}}
#
# Releases resources of the "resource" plugin to the holder of a verified attestation token,
# except one that attested with the INSECURE sample TEE (tests that use the sample attester must
# upload a policy of their own) and one whose EAR status is "contraindicated" for any of its
# submodules (one step beyond upstream's default, which releases to those too; upstream's exact
# policy can still be uploaded). deny_reason says why (a coco extension the KBS reports).
package policy

default allow := false

sample_evidence if input.submods.cpu0["ear.veraison.annotated-evidence"].sample

contraindicated contains name if {
	some name, submod in input.submods
	submod["ear.status"] == "contraindicated"
}

allow if {
	data.plugin == "resource"
	not sample_evidence
	count(contraindicated) == 0
}

deny_reason := "the token was issued for the INSECURE sample TEE (upload a resource policy that allows it, for tests only)" if {
	sample_evidence
} else := concat("", [
	"the token's EAR status is contraindicated for ", concat(", ", sort(contraindicated)),
	" (its attestation policy does not trust the evidence)",
]) if {
	count(contraindicated) > 0
} else := concat("", ["plugin ", data.plugin, " is not released by this policy"]) if {
	data.plugin != "resource"
}
