using System.Diagnostics;

namespace QcowTier.Tests.Infrastructure;

/// <summary>Runs the real QEMU tools (qemu-img, qemu-io) so tests can check our behaviour against theirs.</summary>
public static class Qemu
{
    public sealed record Result(int ExitCode, string StdOut, string StdErr)
    {
        public Result EnsureSuccess()
        {
            if (ExitCode != 0)
            {
                throw new InvalidOperationException($"exit {ExitCode}\nstdout: {StdOut}\nstderr: {StdErr}");
            }
            return this;
        }
    }

    public static bool Available => File.Exists("/usr/bin/qemu-img") && File.Exists("/usr/bin/qemu-io");

    public static Result Img(params string[] args) => Run("qemu-img", args);

    public static Result Io(params string[] args) => Run("qemu-io", args);

    /// <summary>Runs a tool in a folder: QEMU resolves relative external data file names against its working directory.</summary>
    public static Result RunIn(string workingDirectory, string tool, params string[] args) => Run(tool, args, workingDirectory: workingDirectory);

    public static Result Run(string tool, IEnumerable<string> args, TimeSpan? timeout = null, string? workingDirectory = null)
    {
        // Tests run in parallel and spawn processes: a child forked by another test can hold a copy of
        // a descriptor we just closed until it execs, and with it our image lock. QEMU does not retry
        // a lock conflict, so the harness does, briefly.
        var list = args.ToList();
        for (var attempt = 0; ; attempt++)
        {
            var r = RunOnce(tool, list, timeout, workingDirectory);
            if (r.ExitCode == 0 || attempt == 20 || !r.StdErr.Contains("lock", StringComparison.Ordinal) || !r.StdErr.Contains("Failed to get", StringComparison.Ordinal))
            {
                return r;
            }
            Thread.Sleep(50);
        }
    }

    private static Result RunOnce(string tool, IEnumerable<string> args, TimeSpan? timeout, string? workingDirectory)
    {
        var psi = new ProcessStartInfo(tool)
        {
            WorkingDirectory = workingDirectory ?? "",
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {tool}");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout ?? TimeSpan.FromMinutes(2)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{tool} {string.Join(' ', args)} did not finish");
        }
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>qemu-img check; throws with its output unless the image is clean (no errors, no leaks).</summary>
    public static void AssertClean(string path)
    {
        var r = Img("check", "-f", "qcow2", path);
        if (r.ExitCode != 0)
        {
            throw new Xunit.Sdk.XunitException($"qemu-img check {path} exited {r.ExitCode}:\n{r.StdOut}{r.StdErr}");
        }
    }

    /// <summary>qemu-img compare; throws unless the two images have the same content.</summary>
    public static void AssertSameContent(string a, string b, string fmtA = "qcow2", string fmtB = "qcow2")
    {
        var r = Img("compare", "-f", fmtA, "-F", fmtB, a, b);
        if (r.ExitCode != 0)
        {
            throw new Xunit.Sdk.XunitException($"qemu-img compare {a} {b} exited {r.ExitCode}:\n{r.StdOut}{r.StdErr}");
        }
    }
}

/// <summary>A temporary directory deleted at dispose.</summary>
public sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "qcowtier-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
