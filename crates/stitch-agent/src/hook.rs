//! The seam for load-time patching.
//!
//! `stitch-hook` (fanotify permission events + a ptrace hold) will hold a thread that opens a
//! target module until the agent has patched the module as it is mapped — before one
//! instruction of it runs. It is not available yet. Until it is, the agent finds new target
//! processes after the fact: netlink proc connector exec events (checked 20 ms, 200 ms and
//! 2 s after exec) plus a periodic full scan (which also catches `dlopen`). The gap, stated
//! honestly: a new process runs its first milliseconds unpatched, and a library loaded with
//! `dlopen` long after exec stays unpatched until the next periodic scan.
//!
//! A hook implements [`LoadHook`]; `stitchd` runs it on its own thread and treats every pid it
//! reports like an exec event. A hook that holds the loading thread itself must call
//! `notify` and then keep the thread held until the engine's apply (on the controller
//! thread) returned — the synchronous hand-off is part of stitch-hook's integration.

/// A source of "a target module was (or is about to be) loaded in this process" events.
pub trait LoadHook: Send {
    /// Runs until the hook stops; calls `notify(pid)` for each process that loaded (or is
    /// loading) a module of interest. `notify` returns false once the agent is stopping.
    fn run(self: Box<Self>, notify: Box<dyn Fn(i32) -> bool + Send>);
}
