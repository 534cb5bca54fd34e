// Command kube-harness runs a real Kubernetes control plane for the cluster test tier: embedded
// etcd, kube-apiserver, kube-controller-manager and kube-scheduler, all built from the k8s.io
// modules pinned in go.mod. It is one multi-call binary: "up" starts the others as subprocesses.
package main

import (
	"fmt"
	"os"

	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"

	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = `usage: kube-harness COMMAND [FLAGS]

commands:
  up                    start etcd, kube-apiserver and (unless --apiserver-only) the
                        controller-manager and scheduler; write DIR/admin.kubeconfig and
                        DIR/ready.json; stop them all on SIGTERM/SIGINT
  kube-apiserver        the real kube-apiserver (its own flags)
  kube-controller-manager
  kube-scheduler
  version               the Kubernetes release this binary was built from
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	name, args := os.Args[1], os.Args[2:]
	switch name {
	case "up":
		os.Exit(runUp(args))
	case "kube-apiserver":
		os.Exit(runCobra(apiserver.NewAPIServerCommand(), args))
	case "kube-controller-manager":
		os.Exit(runCobra(controllermanager.NewControllerManagerCommand(), args))
	case "kube-scheduler":
		os.Exit(runCobra(scheduler.NewSchedulerCommand(), args))
	case "version":
		fmt.Println(kubeRelease())
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "kube-harness: unknown command %q\n\n%s", name, usage)
		os.Exit(2)
	}
}
