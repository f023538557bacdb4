// Package nbdclient replaces KubeVirt's pkg/storage/nbdclient in the extracted source tree
// that the project's tests build (tests/harness/kubevirt.rs copies it there).
//
// Why it exists: KubeVirt's own package wraps the vendored libguestfs.org/libnbd bindings,
// which need a newer libnbd than Debian 12 ships (1.14 has no nbd_extent64_callback), so
// virt-launcher does not build on Debian 12 with it. Its only importer is
// cmd/virt-launcher, for the NBD server that serves changed-block tracking to backups; the
// tests never take a backup. This stub keeps the same API and answers every NBD call with
// "unimplemented", so the rest of virt-launcher builds unchanged.
package nbdclient

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	nbdv1 "kubevirt.io/kubevirt/pkg/storage/cbt/nbd/v1"
)

// RegisterNBDServer registers a server that refuses every call, in place of KubeVirt's
// libnbd-backed one.
func RegisterNBDServer(srv *grpc.Server, socketPath string) {
	nbdv1.RegisterNBDServer(srv, NewNBDClient(socketPath))
}

// NBDClient has the name and constructor of KubeVirt's, and none of its libnbd calls.
type NBDClient struct {
	socketPath string
}

func NewNBDClient(socketPath string) *NBDClient {
	return &NBDClient{socketPath: socketPath}
}

func (c *NBDClient) Map(*nbdv1.MapRequest, nbdv1.NBD_MapServer) error {
	return status.Errorf(codes.Unimplemented, "NBD map of %s: not built into this test virt-launcher (libnbd stub)", c.socketPath)
}

func (c *NBDClient) Read(*nbdv1.ReadRequest, nbdv1.NBD_ReadServer) error {
	return status.Errorf(codes.Unimplemented, "NBD read of %s: not built into this test virt-launcher (libnbd stub)", c.socketPath)
}
