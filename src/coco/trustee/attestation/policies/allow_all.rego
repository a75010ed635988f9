# Resource policy: release every resource to any holder of a verified attestation token
# (upstream's allow_all sample; `coco kbs-client config set-resource-policy --allow-all`).
# The token may come from the INSECURE sample TEE: for tests and demos only.
package policy

default allow := true
