// kvhm-vmi-from-vm prints the VirtualMachineInstance that KubeVirt's virt-controller sends to
// the API server to start a VirtualMachine: the object an admission policy on VMI CREATE sees
// (KubeVirt's own mutating webhook runs after the policies). It reads the VirtualMachine as
// JSON on stdin and writes the VMI as JSON on stdout, using virt-controller's own code:
// SetupVMIFromVM, then what the VM controller's startVMI adds before it creates the VMI
// (pkg/virt-controller/watch/vm/vm.go). Used by tests/manifests/enrollment.rs.
//
// Left out of startVMI: the ControllerRevision's name (it needs an API server; a status
// field, which a CREATE ignores) and instancetypes and preferences (the test VM has none).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"

	v1 "kubevirt.io/api/core/v1"

	netvmispec "kubevirt.io/kubevirt/pkg/network/vmispec"
	"kubevirt.io/kubevirt/pkg/testutils"
	"kubevirt.io/kubevirt/pkg/virt-controller/watch/vm"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kvhm-vmi-from-vm:", err)
		os.Exit(1)
	}
}

func run() error {
	var virtualMachine v1.VirtualMachine
	decoder := json.NewDecoder(os.Stdin)
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&virtualMachine); err != nil {
		return fmt.Errorf("reading the VirtualMachine from stdin: %w", err)
	}

	vmi := vm.SetupVMIFromVM(&virtualMachine)
	// startVMI: the generation annotation, the VM controller's finalizer, the input device
	// and the pod network interface under KubeVirt's default configuration.
	if vmi.Annotations == nil {
		vmi.Annotations = map[string]string{}
	}
	vmi.Annotations[v1.VirtualMachineGenerationAnnotation] = strconv.FormatInt(virtualMachine.Generation, 10)
	vmi.Finalizers = append(vmi.Finalizers, v1.VirtualMachineControllerFinalizer)
	vm.AutoAttachInputDevice(vmi)
	clusterConfig, _, _ := testutils.NewFakeClusterConfigUsingKV(&v1.KubeVirt{})
	if err := netvmispec.SetDefaultNetworkInterface(clusterConfig, &vmi.Spec); err != nil {
		return fmt.Errorf("setting the default network interface: %w", err)
	}

	// The client sends the object with its kind, as the API server receives it.
	vmi.APIVersion = v1.GroupVersion.String()
	vmi.Kind = "VirtualMachineInstance"
	if err := json.NewEncoder(os.Stdout).Encode(vmi); err != nil {
		return fmt.Errorf("writing the VirtualMachineInstance: %w", err)
	}
	return nil
}
