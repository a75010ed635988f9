# Resource policy: release nothing (upstream's deny_all sample;
# `coco kbs-client config set-resource-policy --deny-all`).
package policy

default allow := false

deny_reason := "the resource policy denies every request (deny_all)"
