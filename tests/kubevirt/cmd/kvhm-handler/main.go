// kvhm-handler plays virt-handler's part for one virt-launcher pod in the project's tests
// (tests/harness/kubevirt_pod.rs), with KubeVirt's own code wherever virt-handler uses it:
//
//   - it serves virt-handler's domain notify server (pkg/virt-handler/notify-server) and the
//     pipe that virt-handler injects into the pod (domain-notify-pipe.sock, proxied with
//     pkg/virt-handler/notify-server/pipe), so virt-launcher's domain events, k8s events and
//     final delete notification reach it as in a cluster;
//   - it defaults the VMI as virt-api's mutating webhook does (pkg/defaults) for a KubeVirt
//     configuration given on the command line;
//   - it reads a VMI's hook sidecars as virt-controller does when it renders the pod
//     (pkg/hooks), so the test starts the sidecar container the annotation asks for;
//   - it drives virt-launcher through virt-handler's client (pkg/virt-handler/cmd-client);
//   - like virt-handler, it deletes the domain once it is no longer alive, which is what
//     lets virt-launcher send its final delete notification and exit;
//   - for the test's timeline, it also follows libvirt's own lifecycle events on the pod's
//     daemon (a read-only connection, as the sidecar has), which mark to the millisecond
//     when the domain was defined, started, paused, resumed and stopped.
//
// The test drives it line by line: one JSON command per line on stdin, one JSON line per
// result or event on stdout, each with a wall-clock timestamp ("unix_ns"). KubeVirt's own
// logging goes to stderr.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"libvirt.org/go/libvirt"

	v1 "kubevirt.io/api/core/v1"
	"kubevirt.io/client-go/log"

	"kubevirt.io/kubevirt/pkg/defaults"
	"kubevirt.io/kubevirt/pkg/hooks"
	cmdv1 "kubevirt.io/kubevirt/pkg/handler-launcher-com/cmd/v1"
	"kubevirt.io/kubevirt/pkg/testutils"
	virtconfig "kubevirt.io/kubevirt/pkg/virt-config"
	cmdclient "kubevirt.io/kubevirt/pkg/virt-handler/cmd-client"
	eventsserver "kubevirt.io/kubevirt/pkg/virt-handler/notify-server"
	"kubevirt.io/kubevirt/pkg/virt-handler/notify-server/pipe"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/api"
)

// KubeVirt's non-root user, owner of what virt-handler puts into a non-root pod.
const nonRootUID = 107

type handler struct {
	out   *json.Encoder
	outMu sync.Mutex

	launcherSocket string
	clusterConfig  *virtconfig.ClusterConfig

	mu sync.Mutex
	// The VMI as virt-handler holds it: defaulted, with the status it has reached.
	vmi *v1.VirtualMachineInstance
	// Set once a Shutoff or Crashed domain was seen: the domain is deleted once.
	deleteRequested bool
	client          cmdclient.LauncherClient
}

// emit writes one JSON line with the current wall-clock time.
func (h *handler) emit(fields map[string]any) {
	fields["unix_ns"] = time.Now().UnixNano()
	h.outMu.Lock()
	defer h.outMu.Unlock()
	if err := h.out.Encode(fields); err != nil {
		log.Log.Reason(err).Error("writing to stdout")
		os.Exit(1)
	}
}

func main() {
	launcherSocket := flag.String("launcher-socket", "", "virt-launcher's command socket, as seen from the host (<sockets volume>/launcher-sock)")
	notifyPipe := flag.String("notify-pipe", "", "where virt-launcher dials virt-handler, as seen from the host (<public volume>/domain-notify-pipe.sock)")
	handlerDir := flag.String("handler-dir", "", "virt-handler's own share directory for domain-notify.sock, outside the pod")
	nonRoot := flag.Bool("non-root", false, "the pod is non-root: give the notify pipe to uid 107, as virt-handler does")
	kubevirtConfig := flag.String("kubevirt-config", "{}", "the KubeVirt CR's spec.configuration, as JSON")
	flag.Parse()
	if *launcherSocket == "" || *notifyPipe == "" || *handlerDir == "" {
		fmt.Fprintln(os.Stderr, "kvhm-handler: --launcher-socket, --notify-pipe and --handler-dir are required")
		os.Exit(2)
	}
	log.InitializeLogging("kvhm-handler")

	config := &v1.KubeVirtConfiguration{}
	if err := json.Unmarshal([]byte(*kubevirtConfig), config); err != nil {
		fmt.Fprintf(os.Stderr, "kvhm-handler: --kubevirt-config: %v\n", err)
		os.Exit(2)
	}
	// KubeVirt's own ClusterConfig over a KubeVirt CR held in memory: the same getters and
	// defaults as virt-handler's and virt-api's, with no API server to watch.
	clusterConfig, _, _ := testutils.NewFakeClusterConfigUsingKVConfig(config)

	h := &handler{
		out:            json.NewEncoder(os.Stdout),
		launcherSocket: *launcherSocket,
		clusterConfig:  clusterConfig,
	}
	if err := h.serveNotify(*handlerDir, *notifyPipe, *nonRoot); err != nil {
		fmt.Fprintf(os.Stderr, "kvhm-handler: %v\n", err)
		os.Exit(1)
	}
	h.emit(map[string]any{"event": "ready"})

	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for scanner.Scan() {
		line := strings.TrimSpace(scanner.Text())
		if line == "" {
			continue
		}
		h.run(line)
	}
	// stdin closed: the test is done with this pod.
}

// serveNotify runs virt-handler's notify server in handlerDir and the pipe in the pod that
// proxies virt-launcher's connections to it.
func (h *handler) serveNotify(handlerDir, notifyPipe string, nonRoot bool) error {
	events := make(chan watch.Event, 100)
	recorder := record.NewFakeRecorder(100)
	// The notify server records k8s events only for a VMI it knows.
	vmiStore := &vmiStore{h: h}
	stop := make(chan struct{})
	go func() {
		if err := eventsserver.RunServer(handlerDir, stop, events, recorder, vmiStore); err != nil {
			log.Log.Reason(err).Error("notify server stopped")
			os.Exit(1)
		}
	}()
	go h.forwardDomainEvents(events)
	go h.forwardK8sEvents(recorder.Events)

	// A stale pipe from an earlier handler of the same pod directory.
	if err := os.Remove(notifyPipe); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the stale notify pipe %s: %w", notifyPipe, err)
	}
	listener, err := net.Listen("unix", notifyPipe)
	if err != nil {
		return fmt.Errorf("listening on the notify pipe %s: %w", notifyPipe, err)
	}
	if nonRoot {
		if err := os.Chown(notifyPipe, nonRootUID, nonRootUID); err != nil {
			return fmt.Errorf("giving the notify pipe to uid %d: %w", nonRootUID, err)
		}
	}
	logger := log.Log.With("component", "notify-pipe")
	ctx := context.Background()
	go pipe.Pipe(ctx, pipe.ChanFromListener(ctx, logger, listener), func(conn net.Conn) {
		pipe.Proxy(logger, conn, pipe.NewConnectToNotifyFunc(handlerDir))
	})
	return nil
}

func (h *handler) forwardDomainEvents(events <-chan watch.Event) {
	for event := range events {
		domain, ok := event.Object.(*api.Domain)
		if !ok {
			h.emit(map[string]any{"event": "domain", "type": string(event.Type), "error": fmt.Sprintf("%v", event.Object)})
			continue
		}
		h.emit(map[string]any{
			"event":   "domain",
			"type":    string(event.Type),
			"status":  string(domain.Status.Status),
			"reason":  string(domain.Status.Reason),
			"deleted": domain.ObjectMeta.DeletionTimestamp != nil,
			"uid":     string(domain.ObjectMeta.UID),
		})
		h.track(domain)
	}
}

// track does what virt-handler does with a domain event that matters here: a running
// domain makes the VMI Running; a domain that no longer runs is deleted, once.
func (h *handler) track(domain *api.Domain) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.vmi == nil || domain.ObjectMeta.DeletionTimestamp != nil {
		return
	}
	switch domain.Status.Status {
	case api.Running, api.Paused:
		h.vmi.Status.Phase = v1.Running
	case api.Shutoff, api.Crashed:
		// A domain that was just defined is Shutoff too, with no reason: virt-handler
		// leaves that one alone while the VMI is only scheduled.
		starting := !h.vmi.IsRunning() && (domain.Status.Reason == api.ReasonUnknown || domain.Status.Reason == "")
		if starting || h.deleteRequested || h.client == nil {
			return
		}
		h.deleteRequested = true
		h.vmi.Status.Phase = v1.Succeeded
		vmi, client := h.vmi.DeepCopy(), h.client
		go func() {
			err := client.DeleteDomain(vmi)
			if cmdclient.IsDisconnected(err) {
				// virt-launcher is on its way out already; virt-handler ignores this too.
				err = nil
			}
			h.emit(result("deleteDomain", 0, err, nil))
		}()
	}
}

func (h *handler) forwardK8sEvents(events <-chan string) {
	for event := range events {
		h.emit(map[string]any{"event": "k8s", "message": event})
	}
}

type command struct {
	ID      int             `json:"id"`
	Command string          `json:"command"`
	VMI     json.RawMessage `json:"vmi,omitempty"`
	Timeout string          `json:"timeout,omitempty"`
	URI     string          `json:"uri,omitempty"`
}

func result(name string, id int, err error, extra map[string]any) map[string]any {
	fields := map[string]any{"event": "result", "command": name, "id": id, "ok": err == nil}
	if err != nil {
		fields["error"] = err.Error()
	}
	for k, v := range extra {
		fields[k] = v
	}
	return fields
}

func (h *handler) run(line string) {
	var cmd command
	if err := json.Unmarshal([]byte(line), &cmd); err != nil {
		h.emit(result("", 0, fmt.Errorf("unreadable command %q: %w", line, err), nil))
		return
	}
	extra, err := h.execute(&cmd)
	h.emit(result(cmd.Command, cmd.ID, err, extra))
}

func (h *handler) execute(cmd *command) (map[string]any, error) {
	switch cmd.Command {
	case "connect":
		return nil, h.connect(cmd.Timeout)
	case "watchLibvirt":
		return nil, h.watchLibvirt(cmd.URI, cmd.Timeout)
	case "sync":
		if len(cmd.VMI) > 0 {
			if err := h.setVMI(cmd.VMI); err != nil {
				return nil, err
			}
		}
		client, vmi, err := h.current()
		if err != nil {
			return nil, err
		}
		return nil, client.SyncVirtualMachine(vmi, h.options(vmi))
	case "hookSidecars":
		// What virt-controller reads to render the pod's hook-sidecar-<i> containers.
		vmi := &v1.VirtualMachineInstance{}
		if err := json.Unmarshal(cmd.VMI, vmi); err != nil {
			return nil, fmt.Errorf("reading the VMI: %w", err)
		}
		sidecars, err := hooks.UnmarshalHookSidecarList(vmi)
		if err != nil {
			return nil, fmt.Errorf("reading the %s annotation: %w", hooks.HookSidecarListAnnotationName, err)
		}
		return map[string]any{"sidecars": sidecars}, nil
	case "getDomain":
		client, _, err := h.current()
		if err != nil {
			return nil, err
		}
		domain, exists, err := client.GetDomain()
		if err != nil || !exists {
			return map[string]any{"exists": exists}, err
		}
		return map[string]any{
			"exists": true,
			"status": string(domain.Status.Status),
			"reason": string(domain.Status.Reason),
			"type":   domain.Spec.Type,
			"uid":    string(domain.ObjectMeta.UID),
		}, nil
	}
	client, vmi, err := h.current()
	if err != nil {
		return nil, err
	}
	switch cmd.Command {
	case "pause":
		return nil, client.PauseVirtualMachine(vmi)
	case "unpause":
		return nil, client.UnpauseVirtualMachine(vmi)
	case "shutdown":
		return nil, client.ShutdownVirtualMachine(vmi)
	case "kill":
		return nil, client.KillVirtualMachine(vmi)
	}
	return nil, fmt.Errorf("unknown command %q", cmd.Command)
}

// watchLibvirt opens a read-only connection to the pod's daemon, retrying until it answers
// (virt-launcher starts it), and emits every domain lifecycle event on it from then on.
func (h *handler) watchLibvirt(uri, timeout string) error {
	wait, err := parseTimeout(timeout)
	if err != nil {
		return err
	}
	libvirtEventLoop.Do(func() {
		if err := libvirt.EventRegisterDefaultImpl(); err != nil {
			log.Log.Reason(err).Error("registering libvirt's event loop")
			os.Exit(1)
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					log.Log.Reason(err).Error("running libvirt's event loop")
					time.Sleep(time.Second)
				}
			}
		}()
	})
	deadline := time.Now().Add(wait)
	for {
		conn, err := libvirt.NewConnectReadOnly(uri)
		if err == nil {
			_, err = conn.DomainEventLifecycleRegister(nil, func(_ *libvirt.Connect, d *libvirt.Domain, event *libvirt.DomainEventLifecycle) {
				name, _ := d.GetName()
				h.emit(map[string]any{
					"event":     "libvirt",
					"domain":    name,
					"lifecycle": lifecycleName(event.Event),
					"detail":    event.String(),
				})
			})
			if err == nil {
				return nil
			}
			conn.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("following lifecycle events on %s: %w", uri, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var libvirtEventLoop sync.Once

func lifecycleName(event libvirt.DomainEventType) string {
	switch event {
	case libvirt.DOMAIN_EVENT_DEFINED:
		return "defined"
	case libvirt.DOMAIN_EVENT_UNDEFINED:
		return "undefined"
	case libvirt.DOMAIN_EVENT_STARTED:
		return "started"
	case libvirt.DOMAIN_EVENT_SUSPENDED:
		return "suspended"
	case libvirt.DOMAIN_EVENT_RESUMED:
		return "resumed"
	case libvirt.DOMAIN_EVENT_STOPPED:
		return "stopped"
	case libvirt.DOMAIN_EVENT_SHUTDOWN:
		return "shutdown"
	case libvirt.DOMAIN_EVENT_PMSUSPENDED:
		return "pmsuspended"
	case libvirt.DOMAIN_EVENT_CRASHED:
		return "crashed"
	}
	return fmt.Sprintf("event-%d", event)
}

func parseTimeout(timeout string) (time.Duration, error) {
	if timeout == "" {
		return 5 * time.Minute, nil
	}
	wait, err := time.ParseDuration(timeout)
	if err != nil {
		return 0, fmt.Errorf("timeout %q: %w", timeout, err)
	}
	return wait, nil
}

// connect waits, as virt-handler does, for virt-launcher to mark itself ready (the
// launcher-init-sock renamed to launcher-sock) and to answer a ping.
func (h *handler) connect(timeout string) error {
	wait, err := parseTimeout(timeout)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(wait)
	var last error = errors.New("the socket never appeared")
	for time.Now().Before(deadline) {
		if _, err := os.Stat(h.launcherSocket); err == nil {
			client, err := cmdclient.NewClient(h.launcherSocket)
			if err == nil {
				if err = client.Ping(); err == nil {
					h.mu.Lock()
					if h.client != nil {
						h.client.Close()
					}
					h.client = client
					h.mu.Unlock()
					return nil
				}
				client.Close()
			}
			last = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("virt-launcher at %s not ready within %s: %w", h.launcherSocket, wait, last)
}

// setVMI takes the VMI as a user would create it and makes it what virt-handler gets: the
// webhook's defaults, scheduled on this node.
func (h *handler) setVMI(raw json.RawMessage) error {
	vmi := &v1.VirtualMachineInstance{}
	if err := json.Unmarshal(raw, vmi); err != nil {
		return fmt.Errorf("reading the VMI: %w", err)
	}
	if err := defaults.SetDefaultVirtualMachineInstance(h.clusterConfig, vmi); err != nil {
		return fmt.Errorf("defaulting the VMI: %w", err)
	}
	if vmi.Status.Phase == "" {
		vmi.Status.Phase = v1.Scheduled
	}
	h.mu.Lock()
	h.vmi = vmi
	h.deleteRequested = false
	h.mu.Unlock()
	return nil
}

func (h *handler) current() (cmdclient.LauncherClient, *v1.VirtualMachineInstance, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.client == nil {
		return nil, nil, errors.New("not connected to virt-launcher: send connect first")
	}
	if h.vmi == nil {
		return nil, nil, errors.New("no VMI yet: send sync with a vmi first")
	}
	return h.client, h.vmi.DeepCopy(), nil
}

// options are what virt-handler's virtualMachineOptions builds from the cluster config
// (pkg/virt-handler/options.go, not exported).
func (h *handler) options(vmi *v1.VirtualMachineInstance) *cmdv1.VirtualMachineOptions {
	c := h.clusterConfig
	options := &cmdv1.VirtualMachineOptions{
		MemBalloonStatsPeriod: c.GetMemBalloonStatsPeriod(),
		Topology:              &cmdv1.Topology{},
		DisksInfo:             map[string]*cmdv1.DiskInfo{},
		ClusterConfig: &cmdv1.ClusterConfig{
			FreePageReportingDisabled:    c.IsFreePageReportingDisabled(),
			BochsDisplayForEFIGuests:     !c.VGADisplayForEFIGuestsEnabled(),
			SerialConsoleLogDisabled:     c.IsSerialConsoleLogDisabled(),
			PCINUMAAwareTopologyEnabled:  c.PCINUMAAwareTopologyEnabled(),
			VGPULiveMigrationEnabled:     c.VGPULiveMigrationEnabled(),
			GraceIOVirtualizationEnabled: c.GraceIOVirtualizationEnabled(),
		},
	}
	if smbios := c.GetSMBIOS(); smbios != nil {
		options.VirtualMachineSMBios = &cmdv1.SMBios{
			Family:       smbios.Family,
			Product:      smbios.Product,
			Manufacturer: smbios.Manufacturer,
			Sku:          smbios.Sku,
			Version:      smbios.Version,
		}
	}
	return options
}

// vmiStore is the one-VMI store the notify server looks k8s events' VMIs up in.
type vmiStore struct {
	cache.Store
	h *handler
}

func (s *vmiStore) GetByKey(key string) (any, bool, error) {
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	if s.h.vmi == nil || key != s.h.vmi.Namespace+"/"+s.h.vmi.Name {
		return nil, false, nil
	}
	return s.h.vmi.DeepCopy(), true, nil
}
