// "up": certificates, embedded etcd, and the control-plane processes with production flags.

package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
)

// Ready is what DIR/ready.json holds once the control plane answers.
type Ready struct {
	Release     string  `json:"release"`
	Server      string  `json:"server"`
	Kubeconfig  string  `json:"kubeconfig"`
	CAFile      string  `json:"caFile"`
	Etcd        string  `json:"etcd"`
	PID         int     `json:"pid"`
	Controllers bool    `json:"controllers"`
	StartupSecs float64 `json:"startupSeconds"`
}

func runCobra(cmd *cobra.Command, args []string) int {
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

func kubeRelease() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "k8s.io/kubernetes" {
				return dep.Version
			}
		}
	}
	return "unknown"
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

type upOptions struct {
	dir            string
	apiserverOnly  bool
	port           int
	exitWithParent bool
	timeout        time.Duration
}

func runUp(args []string) int {
	var opts upOptions
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	fs.StringVar(&opts.dir, "dir", "", "state directory (certificates, etcd data, logs, kubeconfigs)")
	fs.BoolVar(&opts.apiserverOnly, "apiserver-only", false, "start etcd and kube-apiserver only")
	fs.IntVar(&opts.port, "port", 0, "kube-apiserver secure port (0: a free one)")
	fs.BoolVar(&opts.exitWithParent, "exit-with-parent", false, "stop everything when the parent process goes away")
	fs.DurationVar(&opts.timeout, "timeout", 120*time.Second, "how long to wait for the control plane to answer")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if opts.dir == "" {
		fmt.Fprintln(os.Stderr, "kube-harness up: --dir is required")
		return 2
	}
	if err := up(opts); err != nil {
		fmt.Fprintf(os.Stderr, "kube-harness up: %v\n", err)
		return 1
	}
	return 0
}

func up(opts upOptions) error {
	started := time.Now()
	dir, err := filepath.Abs(opts.dir)
	if err != nil {
		return err
	}
	for _, sub := range []string{"pki", "logs", "etcd"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return err
		}
	}
	_ = os.Remove(filepath.Join(dir, "ready.json"))
	self, err := os.Executable()
	if err != nil {
		return err
	}
	port := opts.port
	if port == 0 {
		if port, err = freePort(); err != nil {
			return err
		}
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	pki, err := writePKI(filepath.Join(dir, "pki"))
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	kubeconfigs := map[string]string{}
	for _, identity := range pki.clients {
		path := filepath.Join(dir, identity.name+".kubeconfig")
		if err := writeKubeconfig(path, server, pki.caFile, identity.certFile, identity.keyFile); err != nil {
			return err
		}
		kubeconfigs[identity.name] = path
	}

	etcd, etcdURL, err := startEtcd(filepath.Join(dir, "etcd"))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if opts.exitWithParent {
		ctx = watchParent(ctx)
	}

	var procs []*process
	defer func() { stopAll(procs) }()
	apiserver, err := startProcess(self, dir, "kube-apiserver", apiserverFlags(dir, pki, port, etcdURL))
	if err != nil {
		return err
	}
	procs = append(procs, apiserver)
	if err := waitHealthy(ctx, apiserver, server+"/readyz", pki, opts.timeout); err != nil {
		return err
	}
	if !opts.apiserverOnly {
		components := []struct {
			name  string
			flags func(port int) []string
		}{
			{"kube-controller-manager", func(port int) []string {
				return controllerManagerFlags(dir, pki, kubeconfigs["controller-manager"], port)
			}},
			{"kube-scheduler", func(port int) []string {
				return schedulerFlags(dir, kubeconfigs["scheduler"], port)
			}},
		}
		healthz := map[*process]string{}
		for _, component := range components {
			componentPort, err := freePort()
			if err != nil {
				return err
			}
			p, err := startProcess(self, dir, component.name, component.flags(componentPort))
			if err != nil {
				return err
			}
			procs = append(procs, p)
			healthz[p] = fmt.Sprintf("https://127.0.0.1:%d/healthz", componentPort)
		}
		for p, endpoint := range healthz {
			if err := waitHealthy(ctx, p, endpoint, nil, opts.timeout); err != nil {
				return err
			}
		}
	}
	ready := Ready{
		Release:     kubeRelease(),
		Server:      server,
		Kubeconfig:  kubeconfigs["admin"],
		CAFile:      pki.caFile,
		Etcd:        etcdURL,
		PID:         os.Getpid(),
		Controllers: !opts.apiserverOnly,
		StartupSecs: time.Since(started).Seconds(),
	}
	data, _ := json.MarshalIndent(ready, "", "  ")
	tmp := filepath.Join(dir, "ready.json.tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "ready.json")); err != nil {
		return err
	}
	fmt.Printf("control plane %s ready at %s in %.1fs; KUBECONFIG=%s\n",
		ready.Release, server, ready.StartupSecs, ready.Kubeconfig)

	select {
	case <-ctx.Done():
		return nil
	case p := <-exited(procs):
		return fmt.Errorf("%s exited: %v (log: %s)", p.name, p.err, p.logPath)
	}
}

func apiserverFlags(dir string, pki *pkiFiles, port int, etcdURL string) []string {
	return []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caFile,
		"--authorization-mode=Node,RBAC",
		// Beside the default plugins (NamespaceLifecycle, LimitRanger, ServiceAccount,
		// PodSecurity, ResourceQuota, the admission webhooks, ...).
		"--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement,PodSecurity",
		"--allow-privileged=true",
		"--anonymous-auth=false",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + pki.saPublic,
		"--service-account-signing-key-file=" + pki.saPrivate,
		"--service-cluster-ip-range=10.96.0.0/16",
		// The aggregation layer's front proxy, as kubeadm sets it up.
		"--requestheader-client-ca-file=" + pki.caFile,
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-username-headers=X-Remote-User",
		"--proxy-client-cert-file=" + filepath.Join(dir, "pki", "front-proxy-client.crt"),
		"--proxy-client-key-file=" + filepath.Join(dir, "pki", "front-proxy-client.key"),
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--event-ttl=1h",
		"--cert-dir=" + filepath.Join(dir, "pki", "apiserver"),
		"--v=1",
	}
}

// componentFlags are what the controller-manager and the scheduler share: their identity, a
// serving port on loopback, no leader election (one replica each).
func componentFlags(dir, name, kubeconfig string, port int) []string {
	return []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(dir, "pki", name),
		"--leader-elect=false",
		"--profiling=false",
		"--v=1",
	}
}

func controllerManagerFlags(dir string, pki *pkiFiles, kubeconfig string, port int) []string {
	return append(componentFlags(dir, "controller-manager", kubeconfig, port),
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+pki.saPrivate,
		"--root-ca-file="+pki.caFile,
		"--cluster-signing-cert-file="+pki.caFile,
		"--cluster-signing-key-file="+pki.caKey,
		"--controllers=*,bootstrapsigner,tokencleaner",
	)
}

func schedulerFlags(dir, kubeconfig string, port int) []string {
	return componentFlags(dir, "scheduler", kubeconfig, port)
}

func startEtcd(dataDir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	cfg.Name = "harness"
	clientURL, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", clientPort))
	peerURL, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, peerURL.String())
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{filepath.Join(filepath.Dir(dataDir), "logs", "etcd.log")}
	// Tests are throw-away: skip fsync so a slow shared disk does not stall the apiserver.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", fmt.Errorf("not ready after 60s")
	}
	return e, clientURL.String(), nil
}

type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

func startProcess(self, dir, name string, args []string) (*process, error) {
	logPath := filepath.Join(dir, "logs", name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, append([]string{name}, args...)...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

func exited(procs []*process) <-chan *process {
	out := make(chan *process, len(procs))
	for _, p := range procs {
		go func(p *process) {
			<-p.done
			out <- p
		}(p)
	}
	return out
}

func stopAll(procs []*process) {
	for i := len(procs) - 1; i >= 0; i-- {
		p := procs[i]
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
}

func watchParent(ctx context.Context) context.Context {
	parent := os.Getppid()
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		for ctx.Err() == nil {
			if os.Getppid() != parent {
				cancel()
				return
			}
			time.Sleep(500 * time.Millisecond)
		}
	}()
	return ctx
}

func waitHealthy(ctx context.Context, p *process, endpoint string, pki *pkiFiles, timeout time.Duration) error {
	tlsConfig := &tls.Config{InsecureSkipVerify: true} // #nosec: self-signed serving certs of kcm/scheduler
	if pki != nil {
		pool := x509.NewCertPool()
		caPEM, err := os.ReadFile(pki.caFile)
		if err != nil {
			return err
		}
		pool.AppendCertsFromPEM(caPEM)
		cert, err := tls.LoadX509KeyPair(pki.adminCert, pki.adminKey)
		if err != nil {
			return err
		}
		tlsConfig = &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("interrupted while waiting for %s", p.name)
		case <-p.done:
			return fmt.Errorf("%s exited: %v; last lines of %s:\n%s", p.name, p.err, p.logPath, tail(p.logPath, 30))
		default:
		}
		resp, err := client.Get(endpoint)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s not healthy after %s (%s); last lines of %s:\n%s", p.name, timeout, last, p.logPath, tail(p.logPath, 30))
}

func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
