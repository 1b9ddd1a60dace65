using QcowTier.Tests.Crash;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Snapshots;

/// <summary>
/// Power cuts at an even spread of the storage writes of snapshot create, apply and delete. After each
/// cut: the image is either clean but for leaks (qemu-img check), or carries the dirty bit, in which case
/// the next writable open repairs it; the active disk and every listed snapshot hold one of the states
/// the operation goes between, never anything else; repaired, qemu-img check finds it clean.
/// </summary>
public sealed class SnapshotCrashTests
{
    private const int Cluster = 512;
    private const long Size = 256 << 10; // eight L2 tables of 512-byte clusters

    private static byte[] Data(int seed, int length)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    private sealed record Setup(FaultInjectingStorage Storage, byte[] StateA, byte[] StateB);

    /// <summary>State A, snapshot s1 of it, then state B (overlapping writes: shared and copied clusters).</summary>
    private static Setup Build(bool v2)
    {
        var storage = new FaultInjectingStorage(name: "crash.qcow2");
        var a = new byte[Size];
        var b = new byte[Size];
        using (var img = QcowImage.CreateOn(storage, Size, new QcowCreateOptions { ClusterSize = Cluster, Compat = v2 ? QcowCompat.V2 : QcowCompat.V3 }))
        {
            img.Write(0, Data(1, 100 << 10));
            img.Write(150 << 10, Data(2, 40 << 10));
            img.Read(0, a);
            img.CreateSnapshot("s1");
            img.Write(20 << 10, Data(3, 50 << 10));
            img.Write(200 << 10, Data(4, 30 << 10));
            img.Discard(160 << 10, 8 << 10);
            img.Read(0, b);
        }
        return new Setup(storage, a, b);
    }

    private static FaultInjectingStorage Copy(FaultInjectingStorage s) => new(s.DurableImage(), "crash.qcow2");

    public static TheoryData<string, bool> Cases() => new()
    {
        { "create", false }, { "apply", false }, { "delete", false }, { "apply", true },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Power_cut_during_snapshot_operation_never_loses_or_mixes_states(string op, bool v2)
    {
        using var dir = new TempDir();
        var setup = Build(v2);
        var total = Run(setup, op, long.MaxValue, 0, out _).Writes;
        total.Should().BeGreaterThan(5);
        var seed = 0;
        var dirty = 0;
        foreach (var cut in CrashHarness.CutPoints(total, 10))
        {
            foreach (var mode in new[] { CrashMode.DropAll, CrashMode.TornSectors })
            {
                var outcome = Run(setup, op, cut, mode == CrashMode.DropAll ? -1 : ++seed, out var crashed);
                dirty += (crashed[79] & 1) != 0 ? 1 : 0;
                Judge(setup, op, crashed, dir, $"{op}{(v2 ? "-v2" : "")}-cut{cut}-{mode}", v2);
                _ = outcome;
            }
        }
        if (!v2)
        {
            dirty.Should().BeGreaterThan(0, "some cuts land inside the operation, under the dirty bit");
        }
    }

    private sealed record RunResult(long Writes);

    private static RunResult Run(Setup setup, string op, long cutAt, int seed, out byte[] crashed)
    {
        var storage = Copy(setup.Storage);
        var img = QcowImage.OpenOn(storage, new QcowOpenOptions { L2CacheSize = 2 * Cluster, RefcountCacheSize = 2 * Cluster });
        var start = storage.WriteCount;
        storage.CutAtWrite(cutAt);
        try
        {
            switch (op)
            {
                case "create": img.CreateSnapshot("s2"); break;
                case "apply": img.ApplySnapshot("s1"); break;
                default: img.DeleteSnapshot("s1"); break;
            }
            img.Dispose();
        }
        catch (Exception e) when (storage.IsCut)
        {
            _ = e;
            try
            {
                img.Dispose();
            }
            catch (Exception e2) when (storage.IsCut)
            {
                _ = e2;
            }
        }
        var writes = storage.WriteCount - start;
        crashed = seed < 0 ? storage.DurableImage() : storage.CrashImage(new Random(seed), 0.5, tear: true);
        return new RunResult(writes);
    }

    private static void Judge(Setup setup, string op, byte[] crashed, TempDir dir, string label, bool v2)
    {
        var dirty = !v2 && (crashed[79] & 1) != 0; // incompatible_features bit 0, big-endian at 72..79
        var path = dir.File(label + ".qcow2");
        File.WriteAllBytes(path, crashed);
        if (!dirty && !v2)
        {
            QemuTools.AssertNoCorruption(path);
        }
        // What the disk and the snapshots hold, read by us (read-only: nothing repaired yet).
        var allowedActive = op == "apply" ? new[] { setup.StateB, setup.StateA } : [setup.StateB];
        using (var ro = QcowImage.OpenOn(new FaultInjectingStorage(crashed, path), new QcowOpenOptions { ReadOnly = true }))
        {
            AssertOneOf(allowedActive, ReadAll(ro), $"{label}: active disk");
            var names = ro.GetSnapshots().Select(s => s.Name).ToList();
            var allowed = op switch
            {
                "create" => new[] { "s1", "s1,s2" },
                "delete" => ["s1", ""],
                _ => ["s1"],
            };
            allowed.Should().Contain(string.Join(',', names), label);
            foreach (var name in names)
            {
                using var view = QcowImage.OpenOn(new FaultInjectingStorage(crashed, path), new QcowOpenOptions { ReadOnly = true, Snapshot = name });
                QemuTools.AssertBytesEqual(name == "s1" ? setup.StateA : setup.StateB, ReadAll(view), $"{label}: snapshot {name}");
            }
        }
        if (dirty)
        {
            // QEMU repairs the same image to clean, with the same content.
            var copy = dir.File(label + "-qemu.qcow2");
            File.WriteAllBytes(copy, crashed);
            Qemu.Img("check", "-r", "all", "-f", "qcow2", copy);
            QemuTools.AssertClean(copy);
            AssertOneOf(allowedActive, QemuTools.ReadRaw(copy, dir), $"{label}: active disk after qemu-img check -r all");
            File.Delete(copy);
        }
        // The next writable open repairs a dirty image; leaks are freed by -r leaks; then qemu-img finds it clean.
        using (var rw = QcowImage.Open(path))
        {
            if (!rw.Check().IsClean)
            {
                rw.Check(QcowRepairMode.All);
            }
        }
        QemuTools.AssertClean(path);
        var names2 = Qemu.Img("snapshot", "-l", path).EnsureSuccess().StdOut;
        if (names2.Contains("s1", StringComparison.Ordinal))
        {
            QemuTools.AssertBytesEqual(setup.StateA, SnapshotTests.QemuSnapshotContent(path, "s1", dir), $"{label}: s1 after repair, read by QEMU");
        }
        AssertOneOf(allowedActive, QemuTools.ReadRaw(path, dir), $"{label}: active disk after repair, read by QEMU");
        File.Delete(path);
    }

    private static byte[] ReadAll(QcowImage img)
    {
        var b = new byte[img.Size];
        img.Read(0, b);
        return b;
    }

    private static void AssertOneOf(byte[][] allowed, byte[] actual, string what)
    {
        if (allowed.Any(a => a.AsSpan().SequenceEqual(actual)))
        {
            return;
        }
        QemuTools.AssertBytesEqual(allowed[0], actual, what + " (matches none of the allowed states)");
    }
}
