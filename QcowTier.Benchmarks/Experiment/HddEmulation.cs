using System.Diagnostics;
using System.Globalization;

namespace QcowTier.Benchmarks.Experiment;

/// <summary>
/// How the HDD data file is made slow for a replay.
/// <list type="bullet">
/// <item><b>slowdisk</b>: the image's HDD data file is exposed through <c>/work/shared/tools/slowdisk</c>
/// (nbdkit delay + rate filters behind nbdfuse) and the image is opened with
/// <see cref="QcowOpenOptions.TierDataFile"/> naming the exposed file, cache=none (O_DIRECT), so every
/// HDD read pays the injected latency.</item>
/// <item><b>in-process</b>: the data file stays local (cache=none), and the replay loop sleeps after every
/// read that the placement puts on HDD until latency + bytes/rate has passed since the read began.</item>
/// </list>
/// </summary>
internal sealed class HddEmulation
{
    public HddEmulation(string? slowdiskTool, double latencyMs, double bytesPerSecond)
    {
        Tool = slowdiskTool;
        LatencyMs = latencyMs;
        BytesPerSecond = bytesPerSecond;
    }

    /// <summary>The slowdisk script, or null for the in-process model.</summary>
    public string? Tool { get; private set; }

    public double LatencyMs { get; }

    public double BytesPerSecond { get; }

    public bool InProcess => Tool is null;

    public string FallbackReason { get; private set; } = "";

    public string Describe() => InProcess
        ? $"in-process latency model: sleep until {LatencyMs} ms + bytes / {BytesPerSecond / 1e6:0} MB/s after each read placed on HDD (data file local, cache=none){(FallbackReason.Length > 0 ? "; fallback because " + FallbackReason : "")}"
        : $"slowdisk ({Tool}): nbdkit file plugin + delay filter (rdelay=wdelay={LatencyMs} ms) + rate filter ({BytesPerSecond / 1e6:0}M bytes/s) behind nbdfuse; image opened with cache=none (O_DIRECT), HDD data file named through QcowOpenOptions.TierDataFile";

    /// <summary>A mounted slow view of a file (or the local file itself for the in-process model).</summary>
    public sealed class Mount : IDisposable
    {
        private readonly HddEmulation _owner;
        private readonly string? _dir;

        internal Mount(HddEmulation owner, string path, string? dir)
        {
            _owner = owner;
            Path = path;
            _dir = dir;
        }

        public string Path { get; }

        public void Dispose()
        {
            if (_dir is not null)
            {
                _owner.RunTool("stop", _dir);
            }
        }
    }

    /// <summary>Exposes <paramref name="backing"/> slowly; falls back to the in-process model (for good) when slowdisk fails.</summary>
    public Mount Expose(string backing, string mountDir)
    {
        if (Tool is not null)
        {
            try
            {
                var output = RunTool("start", backing, mountDir, LatencyMs.ToString(CultureInfo.InvariantCulture), ((long)BytesPerSecond).ToString(CultureInfo.InvariantCulture));
                var path = output.Trim().Split('\n').Last().Trim();
                if (File.Exists(path))
                {
                    return new Mount(this, path, mountDir);
                }
                RunTool("stop", mountDir);
                throw new InvalidOperationException($"slowdisk printed {output.Trim()}, which is not a file");
            }
            catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception or IOException)
            {
                FallbackReason = "slowdisk failed: " + e.Message.Split('\n')[0];
                Console.Error.WriteLine($"experiment: {FallbackReason}; using the in-process latency model from now on");
                Tool = null;
            }
        }
        return new Mount(this, backing, null);
    }

    internal string RunTool(params string[] args)
    {
        var psi = new ProcessStartInfo(Tool ?? throw new InvalidOperationException("no slowdisk tool"))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start slowdisk");
        // slowdisk's "start" leaves nbdfuse running in the background with our pipes inherited only
        // through nohup's redirection to a log, so reading to the end returns when the script exits.
        var stdout = p.StandardOutput.ReadToEnd();
        var stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0)
        {
            throw new InvalidOperationException($"slowdisk {string.Join(' ', args)} exited {p.ExitCode}: {stderr.Trim()}");
        }
        if (args[0] == "stop")
        {
            // Give the FUSE daemon a moment to go before the next mount reuses the folder.
            for (var i = 0; i < 50 && IsMounted(args[1]); i++)
            {
                Thread.Sleep(100);
            }
        }
        return stdout;
    }

    private static bool IsMounted(string dir)
    {
        try
        {
            var full = System.IO.Path.GetFullPath(dir).TrimEnd('/');
            return File.ReadLines("/proc/mounts").Any(l => l.Split(' ').ElementAtOrDefault(1) == full);
        }
        catch (IOException)
        {
            return false;
        }
    }

    /// <summary>In-process model: wait out the rest of an HDD request that began at <paramref name="startTicks"/>.</summary>
    public void Delay(long startTicks, int bytes)
    {
        var target = startTicks + (long)((LatencyMs / 1000 + bytes / BytesPerSecond) * Stopwatch.Frequency);
        while (true)
        {
            var left = target - Stopwatch.GetTimestamp();
            if (left <= 0)
            {
                return;
            }
            var ms = left * 1000 / Stopwatch.Frequency;
            if (ms >= 2)
            {
                Thread.Sleep((int)(ms - 1));
            }
            else
            {
                Thread.SpinWait(50);
            }
        }
    }
}
