# Resource policy: release a resource only when every submodule of the token has the EAR status
# "affirming" (upstream's affirming sample; `coco kbs-client config set-resource-policy --affirming`).
package policy

default allow := false

not_affirming contains name if {
	some name, submod in input.submods
	submod["ear.status"] != "affirming"
}

allow if {
	count(input.submods) > 0
	count(not_affirming) == 0
}

deny_reason := concat("", [
	"the token's EAR status is not affirming for ", concat(", ", sort(not_affirming)),
]) if {
	count(not_affirming) > 0
} else := "the token has no submodule" if {
	count(input.submods) == 0
}
