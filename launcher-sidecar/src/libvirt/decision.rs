//! Whether a domain, in the state libvirt gives for it, is to be reported (DESIGN.md,
//! series lifecycle): a series exists while the domain runs here, paused included, but a
//! domain that is paused before it ever ran here (started paused, a migration target)
//! is not running here yet.

use virt::domain::{DomainPausedReason, DomainState, DomainStateEnum, DomainStateReasonEnum};
use virt::enumutil::Enum;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It runs here: report it, paused or not.
    Report { paused: bool },
    /// Paused and not reported: it has not run here yet, so no report until it does.
    Hold,
    /// It does not run: no report.
    Withdraw,
}

/// What to do with one domain, from its state and the reason libvirt gives for it,
/// whether it is reported now, and whether this is the sidecar's first sync (which
/// cannot know what a paused domain did before, only guess from why it is paused).
pub fn decide(
    state: DomainStateEnum,
    reason: DomainStateReasonEnum,
    reported: bool,
    first_sync: bool,
) -> Decision {
    let paused = match state.unwrap_or(DomainState::NoState) {
        // A domain shutting down still runs.
        DomainState::Running | DomainState::Blocked | DomainState::Shutdown => false,
        DomainState::Paused | DomainState::PMSuspended => true,
        DomainState::Shutoff | DomainState::Crashed | DomainState::NoState => {
            return Decision::Withdraw;
        }
    };
    if paused && !reported && !(first_sync && has_run(reason)) {
        return Decision::Hold;
    }
    Decision::Report { paused }
}

/// Whether a paused domain found at start has run before, judging by why it is paused.
fn has_run(reason: DomainStateReasonEnum) -> bool {
    use virt::domain::DomainStateReason;
    match reason {
        Enum::Known(DomainStateReason::Paused(paused)) => !matches!(
            paused,
            Enum::Known(DomainPausedReason::Migration | DomainPausedReason::StartingUp)
        ),
        // Suspended by the guest itself.
        Enum::Known(DomainStateReason::PMSuspended(_)) => true,
        _ => false,
    }
}

/// Each case as KubeVirt's own virt-launcher drove libvirt in the recordings
/// (../shared/kubevirt-recordings/scenarios/<scenario>/pod-0/virt-launcher-events.jsonl,
/// whose `kubevirt domain status: State(Old) reason: Reason(Old)` lines give the states).
#[cfg(test)]
mod tests {
    use virt::domain::{
        DomainPMSuspendedReason, DomainRunningReason, DomainShutdownReason, DomainShutoffReason,
        DomainStateReason,
    };

    use super::*;
    use Decision::{Hold, Report, Withdraw};

    type State = (DomainStateEnum, DomainStateReasonEnum);

    fn running(reason: DomainRunningReason) -> State {
        (
            Enum::Known(DomainState::Running),
            Enum::Known(DomainStateReason::Running(Enum::Known(reason))),
        )
    }

    fn paused(reason: DomainPausedReason) -> State {
        (
            Enum::Known(DomainState::Paused),
            Enum::Known(DomainStateReason::Paused(Enum::Known(reason))),
        )
    }

    fn shutting_down() -> State {
        (
            Enum::Known(DomainState::Shutdown),
            Enum::Known(DomainStateReason::Shutdown(Enum::Known(
                DomainShutdownReason::Unknown,
            ))),
        )
    }

    fn shut_off(reason: DomainShutoffReason) -> State {
        (
            Enum::Known(DomainState::Shutoff),
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(reason))),
        )
    }

    /// `decide` for a domain in `state`, reported or not, at the first sync or a later one.
    fn at((state, reason): State, reported: bool, first_sync: bool) -> Decision {
        decide(state, reason, reported, first_sync)
    }

    // non_root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill:
    // resumed/unpaused, then started/booted, and the domain is Running. While QEMU comes
    // up it is Paused(Shutoff) reason StartingUp, as the status lines of the same start in
    // pause_and_unpause_keep_the_series_and_show_its_state and most other scenarios show.
    #[test]
    fn a_normal_start_is_held_while_starting_up_and_reported_once_running() {
        for first_sync in [false, true] {
            let starting = at(paused(DomainPausedReason::StartingUp), false, first_sync);
            assert_eq!(starting, Hold, "first sync: {first_sync}");
        }
        for reason in [DomainRunningReason::Unpaused, DomainRunningReason::Booted] {
            assert_eq!(at(running(reason), false, false), Report { paused: false });
        }
    }

    // a_vmi_started_paused_has_no_series_until_it_is_unpaused: started/booted and
    // suspended/paused leave it Paused(Paused) reason User(StartingUp); resumed/unpaused
    // 10 s later makes it Running(Paused).
    #[test]
    fn a_vmi_started_paused_is_held_until_it_is_unpaused() {
        assert_eq!(
            at(paused(DomainPausedReason::StartingUp), false, false),
            Hold
        );
        assert_eq!(at(paused(DomainPausedReason::User), false, false), Hold);
        assert_eq!(
            at(running(DomainRunningReason::Unpaused), false, false),
            Report { paused: false }
        );
    }

    // pause_and_unpause_keep_the_series_and_show_its_state: suspended/paused makes the
    // running domain Paused(Running) reason User, resumed/unpaused Running(Paused).
    #[test]
    fn pause_and_unpause_keep_the_report_and_show_its_state() {
        assert_eq!(
            at(paused(DomainPausedReason::User), true, false),
            Report { paused: true }
        );
        assert_eq!(
            at(running(DomainRunningReason::Unpaused), true, false),
            Report { paused: false }
        );
    }

    // Not in the recordings (they hold no migration): DESIGN.md, KubeVirt facts, and
    // tests/migration.rs. The target's domain arrives paused with reason Migration and
    // resumes with reason Migrated; the source's stops with reason Migrated.
    #[test]
    fn a_migration_target_is_held_until_it_runs_and_the_source_withdrawn() {
        for first_sync in [false, true] {
            let arriving = at(paused(DomainPausedReason::Migration), false, first_sync);
            assert_eq!(arriving, Hold, "first sync: {first_sync}");
        }
        assert_eq!(
            at(running(DomainRunningReason::Migrated), false, false),
            Report { paused: false }
        );
        assert_eq!(
            at(shut_off(DomainShutoffReason::Migrated), true, false),
            Withdraw
        );
    }

    // a_sidecar_killed_and_restarted_mid_run_reports_the_vm_again: the new sidecar's
    // first sync finds the domain Running and nothing reported yet.
    #[test]
    fn a_sidecar_restarted_while_the_vm_runs_reports_it_at_the_first_sync() {
        assert_eq!(
            at(running(DomainRunningReason::Unpaused), false, true),
            Report { paused: false }
        );
    }

    // The restart of a_sidecar_killed_and_restarted_mid_run_reports_the_vm_again while
    // the VM is paused as in pause_and_unpause_keep_the_series_and_show_its_state: paused
    // by the user (or suspended by the guest), so it has run.
    #[test]
    fn a_sidecar_restarted_while_the_vm_is_paused_by_the_user_reports_it_paused() {
        assert_eq!(
            at(paused(DomainPausedReason::User), false, true),
            Report { paused: true }
        );
        let suspended = (
            Enum::Known(DomainState::PMSuspended),
            Enum::Known(DomainStateReason::PMSuspended(Enum::Known(
                DomainPMSuspendedReason::Unknown,
            ))),
        );
        assert_eq!(at(suspended, false, true), Report { paused: true });
    }

    // a_vmi_being_deleted_keeps_its_series_while_the_guest_runs_out_its_grace_period, and
    // the kill that ends
    // non_root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill:
    // the shutdown/unknown event (libvirt's state Shutdown: being shut down), then
    // stopped/destroyed, which leaves it Shutoff(Running) reason Destroyed.
    #[test]
    fn a_killed_vmi_is_reported_while_shutting_down_and_withdrawn_once_destroyed() {
        assert_eq!(at(shutting_down(), true, false), Report { paused: false });
        assert_eq!(
            at(shut_off(DomainShutoffReason::Destroyed), true, false),
            Withdraw
        );
    }

    // a_guest_that_powers_itself_off_is_withdrawn_and_the_sidecar_exits: stopped/shutdown
    // leaves it Shutoff(Running) reason Shutdown.
    #[test]
    fn a_guest_that_powers_itself_off_is_withdrawn() {
        assert_eq!(
            at(shut_off(DomainShutoffReason::Shutdown), true, false),
            Withdraw
        );
    }
}
