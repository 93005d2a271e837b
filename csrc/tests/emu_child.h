// Runs a function in a forked child process with its stdout and stderr captured: the emulated tests' mutation
// checks (test_wgmma_emu.cpp, wgmma_probe.cu's emulated build), where a deliberately broken kernel may fail an
// emulation assertion, which ends the process it runs in. POSIX only, as the emulated tests are.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace emu_child {

// body() in a child process: returns the child's exit status (body's return value), or -1 where it did not exit
// (a signal); `out` gets all the child printed. Aborts the test with a message where no child can be started.
template <typename F>
int run(F&& body, std::string& out) {
  int fds[2];
  if (pipe(fds) != 0) {
    std::perror("emu_child::run: pipe");
    std::abort();
  }
  std::fflush(stdout);  // or the child inherits (and writes into the pipe) what the parent has buffered
  std::fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("emu_child::run: fork");
    std::abort();
  }
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    const int rc = body();
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(rc);
  }
  close(fds[1]);
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace emu_child
