using System.Text.RegularExpressions;
using QcowTier.Check;
using QcowTier.Format;
using QcowTier.Storage;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>
/// Power cuts during a repair: at every write the repair makes, cut the power, keep whatever subset
/// of the unflushed writes a disk might have kept, and look at what is left. A cut may leave the
/// repair undone, never a cluster counted lower than it is referenced that was not so before,
/// never a changed guest byte; and running the repair again must finish the job.
/// </summary>
public sealed partial class CheckCrashTests
{
    public static TheoryData<string> Cases() =>
    [
        "raised-refcount",
        "zeroed-refcount",
        "lowered-refcount-of-shared",
        "copied-cleared-l2",
        "reftable-entry-zeroed",
        "refblock-overlaps-l1",
        "refblock-misaligned",
    ];

    [Theory]
    [MemberData(nameof(Cases))]
    public void Power_cut_during_repair_leaves_at_worst_leaks(string name)
    {
        var damage = CheckDamageTests.Damages.Single(d => d.Name == name);
        using var dir = new TempDir();
        var damaged = CheckDamageTests.BuildBase(dir);
        damage.Apply(new RawImage(damaged));
        var original = File.ReadAllBytes(damaged);
        var deficitsBefore = Deficits(CheckHarness.Qemu(damaged).StdErr);
        var readable = Qemu.Img("compare", damaged, damaged).ExitCode == 0;

        var dry = new CrashStorage(original);
        QcowChecker.Run(dry, Header(original), QcowRepairMode.All).IsClean.Should().BeTrue();
        dry.Writes.Should().BeGreaterThan(0);

        var rng = new Random(name.Length * 7919);
        for (var cut = 0; cut < dry.Writes; cut++)
        {
            var storage = new CrashStorage(original) { CutAt = cut };
            var act = () => QcowChecker.Run(storage, Header(original), QcowRepairMode.All);
            act.Should().Throw<OperationCanceledException>();

            var crashed = dir.File($"cut-{cut}.qcow2");
            File.WriteAllBytes(crashed, storage.Survivors(rng));
            var seen = CheckHarness.Qemu(crashed);
            var because = $"power cut at write {cut} of {dry.Writes}: {seen}";
            Deficits(seen.StdErr).Should().BeSubsetOf(deficitsBefore, because);
            if (readable)
            {
                Qemu.AssertSameContent(damaged, crashed);
            }

            var again = CheckHarness.Ours(crashed, QcowRepairMode.All);
            again.IsClean.Should().BeTrue(because + "\nrepair after the cut: " + CheckHarness.Describe(again));
            Qemu.AssertClean(crashed);
            if (readable)
            {
                Qemu.AssertSameContent(damaged, crashed);
            }
        }
    }

    private static QcowHeader Header(byte[] image)
        => QcowHeader.Parse(image.AsSpan(0, Math.Min(image.Length, 1 << QcowHeader.MaxClusterBits)), image.Length, "image");

    /// <summary>Clusters qemu-img finds referenced more often than counted: the only damage that loses data.</summary>
    private static HashSet<long> Deficits(string stderr)
    {
        var set = new HashSet<long>();
        foreach (Match m in DeficitLine().Matches(stderr))
        {
            if (long.Parse(m.Groups[2].Value) < long.Parse(m.Groups[3].Value))
            {
                set.Add(long.Parse(m.Groups[1].Value));
            }
        }
        return set;
    }

    [GeneratedRegex(@"^ERROR cluster (\d+) refcount=(\d+) reference=(\d+)$", RegexOptions.Multiline)]
    private static partial Regex DeficitLine();

    /// <summary>
    /// An in-memory disk with a volatile write cache: writes land in the cache, a flush makes them
    /// durable, and a power cut (at a chosen write) keeps any subset of what was not flushed.
    /// </summary>
    private sealed class CrashStorage : ImageStorage
    {
        private readonly List<(long Offset, byte[]? Data, long Length)> _unflushed = [];
        private byte[] _durable;
        private byte[] _current;

        public CrashStorage(byte[] image)
        {
            _durable = (byte[])image.Clone();
            _current = (byte[])image.Clone();
        }

        public int CutAt { get; init; } = -1;

        public int Writes { get; private set; }

        public override string? Name => "crash-test";

        public override long Length => _current.Length;

        public override bool CanWrite => true;

        public override void Read(long offset, Span<byte> buffer)
        {
            buffer.Clear();
            if (offset < _current.Length)
            {
                var n = (int)Math.Min(buffer.Length, _current.Length - offset);
                _current.AsSpan((int)offset, n).CopyTo(buffer);
            }
        }

        public override void Write(long offset, ReadOnlySpan<byte> data)
        {
            Cut();
            _current = Apply(_current, offset, data.ToArray(), -1);
            _unflushed.Add((offset, data.ToArray(), -1));
        }

        public override void SetLength(long length)
        {
            Cut();
            _current = Apply(_current, 0, null, length);
            _unflushed.Add((0, null, length));
        }

        public override void Flush()
        {
            _durable = (byte[])_current.Clone();
            _unflushed.Clear();
        }

        /// <summary>The disk after the cut: everything flushed, and a random subset of the rest, in order.</summary>
        public byte[] Survivors(Random rng)
        {
            var image = (byte[])_durable.Clone();
            foreach (var (offset, data, length) in _unflushed)
            {
                if (rng.Next(2) == 0)
                {
                    image = Apply(image, offset, data, length);
                }
            }
            return image;
        }

        private void Cut()
        {
            if (Writes++ == CutAt)
            {
                throw new OperationCanceledException("power cut");
            }
        }

        private static byte[] Apply(byte[] image, long offset, byte[]? data, long length)
        {
            if (data is null)
            {
                var resized = new byte[length];
                image.AsSpan(0, (int)Math.Min(image.Length, length)).CopyTo(resized);
                return resized;
            }
            if (offset + data.Length > image.Length)
            {
                var grown = new byte[offset + data.Length];
                image.CopyTo(grown, 0);
                image = grown;
            }
            data.CopyTo(image, offset);
            return image;
        }
    }
}
